"""fieldtwin hardware simulator: plant physics served over real device protocols.

Sans-I/O core: ``scenario`` (TOML files), ``physics`` (process components), ``faults``
(catalogue and fault windows), ``engine`` (tick-by-tick simulation and replay),
``codec``/``modbus``/``lineproto`` (wire formats), ``registers`` (Modbus register maps).
I/O edges: ``modbus_server``, ``serial_server``, ``opcua_server`` (behind ``relay``),
``ptys``, ``truth`` (DuckDB ground truth), ``control`` (loopback HTTP), ``runner`` and
``cli`` (``fieldtwin sim``). User documentation: docs/simulator.md.
"""
