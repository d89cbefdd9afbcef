"""The TVM RPC tracker, run in this process and advertised on mDNS (``_tvm-tracker._tcp``)."""
