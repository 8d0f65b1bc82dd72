"""
``synckit-bench``: a load client for any server that speaks the SyncKit protocol (and for a
plain WebSocket echo), built on Twisted and Autobahn like the server it usually measures.
"""
