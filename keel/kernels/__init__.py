"""keel's own compute kernels, where the framework's operators fall short (see each module)."""
