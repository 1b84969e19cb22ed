"""ragserve's own engine: the step loop, output processing, the EngineClient protocol, and the
thread and process fronts that run the loop beside the server."""
