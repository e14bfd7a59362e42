"""Tests of the custom store example beyond the contract suite."""
