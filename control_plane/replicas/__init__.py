"""Control-plane replicas on etcd: any number of stateless control planes sharing one etcd.

records.py       what is kept in etcd besides the store's items, and how each record is spelled (pure)
shared.py        the registry every replica pushes from, rebuilt from etcd's events (pure)
registrar.py     a replica's sessions, written through to etcd
shared_files.py  the tokens and the CA directory: one copy in etcd for every replica
engine.py        one replica: its lease, its card, the watch, the election and the leader's jobs
cluster.py       puts them together for control_plane/app.py
"""
