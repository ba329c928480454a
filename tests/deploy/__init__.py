"""Past one process: packaging, the container, KubeRay, the multi-node cluster, process lifecycle and logs."""
