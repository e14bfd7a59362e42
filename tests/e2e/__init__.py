"""End-to-end tests: uvicorn processes on loopback that share real SQLite files."""
