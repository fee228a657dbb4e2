"""The cluster: typed messages between processes, the router actor, node actors, the edge (requests
rendered and tokenized where they enter), dispatch, the client, deployment and local Ray clusters. Imports cluster.engine, cluster.routing and cluster.errors; never the API,
cli, bench or models.
"""
