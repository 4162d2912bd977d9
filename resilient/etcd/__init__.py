"""etcd access for resilient: the ``KVStore`` contract (``api``), the real client (``client.EtcdKV``, the only
module importing the etcd client library), an in-memory twin (``fake.FakeKV``) and an embedded etcd server
(``server.EmbeddedEtcd`` / ``server.EmbeddedCluster``). Import the submodule you need; this package imports
nothing eagerly so that the fake and the server work without the etcd client library loaded."""
