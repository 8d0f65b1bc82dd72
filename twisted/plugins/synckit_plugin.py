from twisted.application.service import ServiceMaker

synckit = ServiceMaker("SyncKit", "synckit.tap", "SyncKit document sync server (HTTP + WebSocket)", "synckit")
