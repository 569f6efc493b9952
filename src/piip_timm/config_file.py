"""Reading original PIIP config files without running them.

The original configs are Python files (``model = dict(backbone=dict(...))``). Executing a
downloaded file would run whatever it contains, so this evaluates only literals, ``dict(...)``
calls, arithmetic on numbers and names assigned earlier in the same file.
"""
import ast
import json
import operator
from pathlib import Path
from typing import Any, Dict, Mapping, Union

__all__ = ['read_backbone_config']

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}


def _evaluate(node: ast.AST, names: Mapping[str, Any], where: str) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_evaluate(e, names, where) for e in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.Dict):
        return {_evaluate(k, names, where): _evaluate(v, names, where) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == 'dict' and not node.args:
        return {kw.arg: _evaluate(kw.value, names, where) for kw in node.keywords if kw.arg is not None}
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _evaluate(node.operand, names, where)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left, names, where), _evaluate(node.right, names, where)
        if not all(isinstance(v, (int, float)) for v in (left, right)):
            raise ValueError(f'{where}, line {node.lineno}: arithmetic only on numbers is supported.')
        return _BINARY[type(node.op)](left, right)
    if isinstance(node, ast.Name):
        if node.id in names:
            return names[node.id]
        raise ValueError(f'{where}, line {node.lineno}: {node.id!r} is not defined earlier in the file.')
    raise ValueError(f'{where}, line {getattr(node, "lineno", "?")}: unsupported expression '
                     f'{type(node).__name__}; only literals and dict(...) are read.')


def _read_python_config(path: Path) -> Dict[str, Any]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: Dict[str, Any] = {}
    for statement in tree.body:
        if isinstance(statement, ast.Assign) and len(statement.targets) == 1 \
                and isinstance(statement.targets[0], ast.Name):
            try:
                names[statement.targets[0].id] = _evaluate(statement.value, names, str(path))
            except ValueError:
                if statement.targets[0].id == 'model':
                    raise
    return names


def read_backbone_config(path: Union[str, Path]) -> Dict[str, Any]:
    """``model['backbone']`` of an original config (``.py``) or a JSON file (the backbone dict, or a
    dict with ``model.backbone``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'no config file at {str(path)!r}.')
    if path.suffix == '.json':
        config = json.loads(path.read_text())
    elif path.suffix == '.py':
        config = _read_python_config(path)
    else:
        raise ValueError(f'{str(path)!r}: a config must be a .py (original) or .json file.')
    if isinstance(config.get('model'), Mapping) and 'backbone' in config['model']:
        return dict(config['model']['backbone'])
    if any(k.startswith('branch') for k in config):
        return dict(config)
    raise ValueError(f'{str(path)!r} has no model["backbone"] (and is not a backbone dict itself).')
