"""Durable background jobs: a SQLite store shared by every server process, and one worker process per job."""
