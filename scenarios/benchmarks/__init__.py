"""``crashlab bench``: crashlab against the direct tools, side by side, as ratios.

One module per comparison; each runs crashlab and its baseline in the same
run, repeats them and reports medians and percentiles. No module asserts an
absolute time: the figures are reported, the targets are judged by the reader.

- ``api_overhead``:    POST -> finished event vs a direct ``injectNMI``
- ``ipmi_fleet``:      N BMCs at once vs an ``ipmitool`` loop (``emulators/ipmi_sim.py``)
                       and rounds of N in a long-running and a fresh service
- ``redfish_fleet``:   N Redfish systems at once vs a ``curl`` loop (``emulators/redfish_sim.py``)
- ``vbmc_guests``:     rounds of booted guests behind virtualbmc
- ``noisy_neighbour``: another tenant's latency while one floods a hung BMC
- ``footprint``:       RSS and start-up time of ``crashlab serve``
- ``load``:            the load run of scenarios/loadtest.py, audited
- ``scenario_cost``:   the kdump scenario vs the same guest under bare QEMU

Each comparison is a ``base.Benchmark`` object; ``registry.REGISTRY`` lists them in
the order a run measures them. Adding one is a module and a line there.
``service`` runs the ``crashlab serve`` they measure; ``fleet`` is what the
fleet comparisons share; ``stats`` computes the figures.
"""
