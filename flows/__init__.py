"""Prefect flows and the command line: the production story, stage by stage."""
