"""fieldtwin edge agent: drivers, sampler, outbox, uplink, command executor."""
