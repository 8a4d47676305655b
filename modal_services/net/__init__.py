"""The network: the egress policy every outbound fetch goes through, the transfer primitive, and the fetchers by source kind."""
