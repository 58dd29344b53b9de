"""Built-in systems: how an encoder, connector and decoder become one captioner."""

from prefixcap.hookspecs import hookimpl
from prefixcap.registry import ComponentOptions


class PrefixOptions(ComponentOptions):
    pass


@hookimpl
def register_systems(register):
    register("prefix", factory="prefixcap.systems.prefix:PrefixSystem", options=PrefixOptions,
             description="Frozen encoder -> trained connector -> visual tokens as a prefix of a LoRA decoder")
