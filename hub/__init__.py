"""fieldtwin hub: ingest, twin store, drift engine, alarms, commands, audit."""
