"""Pipeline stages: ingest -> resolve -> join -> publish."""
