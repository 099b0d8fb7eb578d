import ast, sys, pathlib
rows=[]
for p in pathlib.Path('roli').rglob('*.py'):
    t=ast.parse(p.read_text())
    for n in ast.walk(t):
        if isinstance(n,(ast.FunctionDef,ast.AsyncFunctionDef)):
            body=n.body
            start=n.lineno
            # skip docstring
            if body and isinstance(body[0],ast.Expr) and isinstance(getattr(body[0],'value',None),ast.Constant) and isinstance(body[0].value.value,str):
                doc=body[0].end_lineno-body[0].lineno+1
            else: doc=0
            length=n.end_lineno-start+1-doc
            rows.append((length,str(p),n.name,start))
for r in sorted(rows,reverse=True)[:30]: print(*r)
