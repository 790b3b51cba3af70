"""Peer denoisers that live outside stemd's environment (tk_r_em: `bench.peers.tk_r_em_bridge`)."""
