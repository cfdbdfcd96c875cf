"""The FedDTL algorithm: client step, server step, GRPO loss, aggregation (DESIGN.md)."""
