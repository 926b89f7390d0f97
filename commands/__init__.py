"""The obd command line: thin click commands over the obd package."""
