-- Orthanc forwards every CR/DX instance it stores to pneumoscan's DICOM node (modality "pneumoscan" in its
-- configuration). pneumoscan's results (SR, and OT for the heat map) are not CR/DX, so they are never sent back.
function OnStoredInstance(instanceId, tags, metadata, origin)
  local modality = tags['Modality']
  if modality == 'CR' or modality == 'DX' then
    SendToModality(instanceId, 'pneumoscan')
  end
end
