"""The Ray Data application around the engine: config, stages, decode actor, Parquet sink, job, command line.

Everything that imports Ray lives here or in jobs/; the library (specvlm/) never does.
"""
