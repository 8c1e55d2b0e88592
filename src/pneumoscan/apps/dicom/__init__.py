"""pneumoscan as a DICOM node: receiving from a PACS (node, receiving), results as DICOM (results), sending them on
(outbox), and pull mode for a PACS that cannot push (pull)."""
