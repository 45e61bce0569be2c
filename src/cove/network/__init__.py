"""Reaching servers inside sandboxes from the cove server: sockets made in a sandbox's network
namespace (`sandbox_socket`) and a reverse proxy over them (`proxy`)."""
