"""The fleet simulator: thousands of devices on virtual time against the real service.

``estuary simulate-fleet`` and ``bench/time_to_target.py`` compare synchronous FedAvg,
plain FedBuff and Estuary on a device trace (:mod:`simulation.fleet.trace`); the
discrete-event core is :mod:`simulation.fleet.engine`, the policies
:mod:`simulation.fleet.policies`, real training :mod:`simulation.fleet.training`, and
one comparison :mod:`simulation.fleet.run`.
"""
