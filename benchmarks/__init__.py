"""Benchmarks: our job against the Spark pandas-UDF + Hugging Face baseline users write instead."""
