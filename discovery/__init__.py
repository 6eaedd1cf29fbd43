"""meshmq.discovery: find the meshmq nodes of a group on the LAN with mDNS / DNS-SD.

``MdnsDiscovery`` advertises one node and tracks its peers; ``Advert`` is what a node
publishes in its TXT record (``encode_advert`` / ``decode_advert``). The simulated-LAN
test helper lives in ``meshmq.discovery.netns`` and is not imported here.
"""

from meshmq.discovery._mdns import SERVICE_TYPE, MdnsDiscovery, instance_label
from meshmq.discovery._net import ENV_INTERFACES, Interfaces, order_addresses, resolve_interfaces
from meshmq.discovery._txt import (
    MAX_GROUP_BYTES,
    MAX_NAME_BYTES,
    MAX_OFFERS_BYTES,
    OFFERS_TRUNCATED,
    PROTO_VERSION,
    Advert,
    decode_advert,
    encode_advert,
    pack_txt,
    summarize_offers,
)
from meshmq.discovery._view import STAT_KEYS, Sighting

__all__ = [
    "ENV_INTERFACES",
    "MAX_GROUP_BYTES",
    "MAX_NAME_BYTES",
    "MAX_OFFERS_BYTES",
    "OFFERS_TRUNCATED",
    "PROTO_VERSION",
    "SERVICE_TYPE",
    "STAT_KEYS",
    "Advert",
    "Interfaces",
    "MdnsDiscovery",
    "Sighting",
    "decode_advert",
    "encode_advert",
    "instance_label",
    "order_addresses",
    "pack_txt",
    "resolve_interfaces",
    "summarize_offers",
]
