"""The submission image replayed without Docker (tools/image_check.py): a clean Debian root built by mmdebstrap,
the Dockerfile's steps run in it, the organizers' flow run inside it offline."""
