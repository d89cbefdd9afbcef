"""Android phones as boards, over adb.

A phone cannot run ``edgetune-agent`` (no TVM wheels for Android's libc), so it serves plain TVM RPC
(TVM's ``tvm_rpc`` built with the NDK, or TVM's Android RPC app) and the workstation does the rest:

- :mod:`.adb`: the one runner every adb command goes through (a deadline on each), and the commands
  built for one phone;
- :mod:`.devices`: phones found by mDNS (``_adb-tls-connect._tcp``, wireless debugging) and by
  ``adb devices -l`` (USB), one row per phone, for ``edgetune devices``;
- :mod:`.phone`: a phone's profile from ``getprop`` and ``/proc/cpuinfo`` (the agent's own profile type);
- :mod:`.phones`: the profiles recorded by ``android connect``, from which ``tune``/``build`` take the
  target and the NDK link takes the API level;
- :mod:`.connect`: ``edgetune android connect``; :mod:`.flash`: ``edgetune flash --adb``.
"""
