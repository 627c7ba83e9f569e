"""p2pfl: decentralized peer-to-peer federated learning."""
