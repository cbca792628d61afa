"""Can this domain trim at all: checks of the domain XML, the report, the discard fix."""
