"""The embedded Milvus Lite client pings as Milvus Lite's gRPC server allows.

pymilvus's default keep-alive pings every 10 s, also on an idle channel; Milvus Lite's gRPC server (gRPC's
default policy) allows one ping per 5 min without data and answers GOAWAY too_many_pings, which gRPC logs
as an error in the server's log about 80 s into every idle spell. Waiting that long is no unit test, so
this checks the channel options the store's client was built with (and that it still works).
"""

from __future__ import annotations

from serving.gallery.store import MilvusStore


def test_the_lite_client_keepalive_is_what_the_lite_server_allows(tmp_path):
    store = MilvusStore(str(tmp_path / "g.db"))
    try:
        options = store.client._get_connection()._grpc_options  # pymilvus: the channel's option overrides
        assert options["grpc.keepalive_time_ms"] >= 300_000  # the server's min ping interval (gRPC default)
        assert options["grpc.keepalive_permit_without_calls"] is False  # no pings on an idle channel
        assert "kiln_galleries" in store.client.list_collections()  # the state collection, made at open
    finally:
        store.close()
