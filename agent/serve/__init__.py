"""Query/Retrieve SCP bridged to DICOMweb: the state archive answered as a DICOM node.

`query` maps C-FIND and C-MOVE/C-GET identifiers to QIDO-RS and back (pure); `cache` keeps the
instances fetched by WADO-RS; `syntax` decides the transfer syntax each instance goes in;
`retrieve` lists, fetches and prepares a retrieval's instances (C-MOVE, C-GET and
`dirigo retrieve` share it); `handlers` are the pynetdicom event handlers.
"""
