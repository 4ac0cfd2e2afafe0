"""The personalization folder sample.py puts back onto the base models: the folder type (folder.py), our
format (ours.py), the reference entry's (reference_entry.py) and the one reader that picks between them
(reader.py). Nothing here imports libs/train: the folder's file names are libs/train_output.py's."""
from libs.personalization.folder import NotAPersonalization, Personalization, base_model
from libs.personalization.ours import TEXT_ENCODER_MODES, adapter_meta, meta_problems, read_meta, save_personalization
from libs.personalization.reader import check_restore_path, folder_contents, load_personalization

__all__ = ["NotAPersonalization", "Personalization", "base_model", "TEXT_ENCODER_MODES", "adapter_meta", "meta_problems", "read_meta",
           "save_personalization", "check_restore_path", "folder_contents", "load_personalization"]
