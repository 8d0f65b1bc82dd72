"""The sync domain: documents, subscriptions, broadcast batching and awareness. No Autobahn here."""
