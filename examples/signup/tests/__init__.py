"""Tests of the signup example, run in-process against a memory store."""
