"""Analysis: reads result tables, writes derived tables (contrasts, criteria, power, verdict).

Between the runners (which generate results with torch) and the report (which only formats the
tables written here): :func:`fcr.analysis.run.analyze` writes every derived table of a run into its
report folder under the names of :mod:`fcr.contract`. Modules that only compute on tables
(:mod:`.stats`, :mod:`.rows`, the criteria) stay free of torch; :mod:`.contrasts` and
:mod:`.paired` read per-image tensors.
"""
