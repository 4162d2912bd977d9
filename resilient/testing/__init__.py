"""Testing helpers shipped with the package (pytest-independent): real etcd servers, clusters and the like,
so any test folder (or a user's own tests) can stand up the real parts resilient runs against."""
