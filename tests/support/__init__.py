"""Harness for tests and benchmarks: real peers (DCMTK, Orthanc) and DICOM data.

Each module owns one kind of thing: `net` (ports and bounded waits), `process`
(stopping child processes), `dcmtk` (DCMTK command-line tools), `orthanc` (an
Orthanc server in a temporary directory) and `datasets` (real and synthetic
DICOM files).
"""
