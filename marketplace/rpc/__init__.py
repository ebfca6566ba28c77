"""The gRPC doors: one servicer module per service, over the domains' service functions."""
