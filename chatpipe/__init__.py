"""chatpipe command line and the embedded services it starts."""
