"""Template definitions shared by the server, the SDK and the CLI: build steps and the Dockerfile subset."""
