"""The cluster: typed messages between processes, the router actor, node actors, dispatch, the client,
deployment and local Ray clusters. Imports cluster.engine, cluster.routing and cluster.errors; never the API,
cli, bench or models.
"""
