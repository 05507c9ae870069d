"""Backends behind one interface (drivers/base.py), looked up by name."""

from __future__ import annotations

import importlib

from drivers.base import Driver

# name -> "module:Class"; imported on first use so a missing optional
# library only affects servers that use that backend.
DRIVER_CLASSES: dict[str, str] = {
    "fake": "drivers.fake:FakeDriver",
    "fake-nonmi": "drivers.fake:FakeNoNMIDriver",
    "libvirt": "drivers.libvirt:LibvirtDriver",
    "ipmi": "drivers.ipmi:IPMIDriver",
    "redfish": "drivers.redfish:RedfishDriver",
}


class UnknownDriver(KeyError):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"unknown driver {self.name!r}; known: {', '.join(sorted(DRIVER_CLASSES))}"


def driver_class(name: str) -> type[Driver]:
    try:
        module_name, class_name = DRIVER_CLASSES[name].split(":")
    except KeyError:
        raise UnknownDriver(name) from None
    cls: type[Driver] = getattr(importlib.import_module(module_name), class_name)
    return cls


def all_driver_classes() -> list[type[Driver]]:
    return [driver_class(name) for name in DRIVER_CLASSES]
