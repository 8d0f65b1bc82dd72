"""Document storage behind L{IStorage}: in memory by default."""
