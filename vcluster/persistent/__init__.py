"""Persistent clusters: libvirt domains kept for days (``vcluster cluster ...``).

Made from the same templates, images, FAM regions and networks as job
clusters, through libvirt-python; recorded in the store and in each
domain's metadata.
"""
