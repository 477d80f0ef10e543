"""Reading YAML that remembers where every value came from, and typed readers over it.

The bottom of the configuration stack: ``source`` parses YAML into located
nodes, ``fields.Section`` reads a mapping key by key with errors naming file,
line and key.  Configuration (``vcluster.config``), network types
(``vcluster.networks``) and image recipes all read their files through it,
so none of them needs another.
"""
