"""Fan-out between server instances behind L{IPubSub}."""
