"""Retrieval galleries on Milvus: storage (:mod:`.store`), the upgrade story (:mod:`.manager`), and the
distributed backfill on Ray Data (:mod:`.ray_backfill`, optional extra ``kiln[ray]``)."""
