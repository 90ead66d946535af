"""Several controller replicas on one database: leases (who drives what), the replica registry, the keeper
thread and the messages a replica leaves for the driver of a deployment."""
