"""Registration of the ReFT tuner with peft.

peft has no plugin mechanism: a tuner type is a member of the `PeftType` enum plus entries in peft's mappings
(`register_peft_method`). This module adds the `REFT` member to the enum (a real member, so `PeftType("REFT")`,
pickling and `isinstance` work) and registers `ReftConfig`/`ReftModel` under it. It is run once when `peft_reft` is
imported and is idempotent.
"""

from __future__ import annotations

import sys

PEFT_TYPE_NAME = "REFT"


def _add_enum_member(enum_cls, name: str):
    """Add `name` (value == name) as a genuine member of the `str`-based enum `enum_cls`."""
    member = str.__new__(enum_cls, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = enum_cls
    member._sort_order_ = len(enum_cls._member_names_)
    if sys.version_info >= (3, 13):
        enum_cls._add_member_(name, member)
    else:
        # the class attribute must be set before the member map entry: EnumType.__setattr__ refuses to reassign members
        setattr(enum_cls, name, member)
        enum_cls._member_map_[name] = member
    enum_cls._member_names_.append(name)
    enum_cls._value2member_map_[name] = member
    return member


def register(config_cls, model_cls) -> None:
    """Make `PeftType.REFT` exist and map it to `config_cls`/`model_cls` in peft (idempotent)."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import PeftType, register_peft_method

    if PEFT_TYPE_NAME not in PeftType.__members__:
        _add_enum_member(PeftType, PEFT_TYPE_NAME)
    peft_type = PeftType[PEFT_TYPE_NAME]
    registered = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
    if registered is config_cls and PEFT_TYPE_TO_TUNER_MAPPING.get(peft_type) is model_cls:
        return
    if registered is not None and registered.__module__.startswith("peft_reft."):
        # peft_reft itself was re-imported (e.g. importlib.reload): point the mappings at the new classes
        PEFT_TYPE_TO_CONFIG_MAPPING[peft_type] = config_cls
        PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = model_cls
        return
    if registered is not None:
        raise RuntimeError(
            f"peft already has a tuner registered as PeftType.{PEFT_TYPE_NAME} ({registered.__module__}."
            f"{registered.__qualname__}); peft_reft will not override it. Use one of the two: uninstall peft_reft, or "
            "install a peft version without a built-in ReFT tuner."
        )
    register_peft_method(name=PEFT_TYPE_NAME.lower(), config_cls=config_cls, model_cls=model_cls)
